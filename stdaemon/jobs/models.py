"""The jobs API's request models (:mod:`stdaemon.http.validation`): what a route accepts, checked
before the service sees it."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field

from stdaemon.http.validation import SQLITE_MAX_INT, BodyModel, QueryModel
from stdaemon.jobs import costs
from stdaemon.jobs import status as st
from stdaemon.providers import settings as ps

MAX_IDEMPOTENCY_KEY = 200

HardwareProfileName = Literal[tuple(costs.HARDWARE_PROFILES)]
JobStatus = Literal[st.STATUSES]
ProviderName = Literal[ps.PROVIDERS]


class SubmitJob(BodyModel):
    """A submission (also what SimpleTuner's CLI sends); fields stdaemon does not use are kept."""

    model_config = ConfigDict(extra="allow")

    config: Optional[dict[str, Any]] = None
    dataloader_config: Union[list[Any], dict[str, Any]] = Field(default_factory=list)
    config_name: Optional[str] = Field(None, max_length=200)
    config_name_to_load: Optional[str] = Field(None, max_length=200)
    # "" = the provider's default profile (as before).
    hardware_profile: Optional[Union[HardwareProfileName, Literal[""]]] = None
    webhook_url: Optional[str] = Field(None, max_length=2048)
    idempotency_key: Optional[str] = Field(None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY,
                                           pattern=r"\S")
    max_runtime_minutes: Optional[Union[int, float]] = None
    # a job whose outputs this one resumes from: its upload credentials may read that job's prefix
    resume_from_job: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class SubmitQuery(QueryModel):
    provider: str = Field("replicate", max_length=64)


class LocalSubmit(BodyModel):
    """SimpleTuner's ``jobs submit`` body (the local queue, which stdaemon does not have)."""

    config_name: Optional[str] = Field(None, max_length=200)
    target: Optional[str] = Field(None, max_length=32)


class ListJobs(QueryModel):
    status: Optional[JobStatus] = None
    provider: Optional[ProviderName] = None
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=SQLITE_MAX_INT)
    sync_active: bool = False