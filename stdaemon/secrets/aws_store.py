"""AWS Secrets Manager: one secret holding a JSON object of name -> value.  Blocking, in
the secrets thread pool only; boto3 is imported on first use (it is heavy, and start-up
must not load it: ``tests/test_lazy_imports.py``)."""

from __future__ import annotations

import json
import threading
from typing import Mapping

from stdaemon.secrets.base import DOWN, ERROR, NETWORK_TIMEOUT, NOT_FOUND, SecretStoreError, flatten


class AwsStore:
    name = "aws"

    def __init__(self, secret_name: str, region: str, endpoint_url: str, environ: Mapping[str, str]):
        self.secret_name = secret_name
        self.region = region
        self.endpoint_url = endpoint_url
        self._environ = environ
        self._client = None
        self._lock = threading.Lock()
        self.location = f"aws:{secret_name}" + (f"@{region}" if region else "")

    @property
    def configured(self) -> bool:
        return bool(self.secret_name)

    def _get_client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config as BotoConfig

                env = self._environ
                session = boto3.session.Session(
                    aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                    aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                    aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
                    region_name=self.region or None,
                )
                self._client = session.client(
                    "secretsmanager",
                    endpoint_url=self.endpoint_url or None,
                    config=BotoConfig(
                        connect_timeout=NETWORK_TIMEOUT,
                        read_timeout=NETWORK_TIMEOUT,
                        retries={"max_attempts": 2, "mode": "standard"},
                    ),
                )
            return self._client

    def load(self) -> dict[str, str]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError as BotoConnectionError,
            NoCredentialsError,
            NoRegionError,
        )

        try:
            response = self._get_client().get_secret_value(SecretId=self.secret_name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ResourceNotFoundException":
                raise SecretStoreError(NOT_FOUND, f"AWS secret {self.secret_name!r} does not exist")
            raise SecretStoreError(ERROR, f"AWS Secrets Manager refused: {code or 'error'}")
        except (NoCredentialsError, NoRegionError) as exc:
            raise SecretStoreError(ERROR, f"AWS Secrets Manager not usable: {type(exc).__name__}")
        except BotoConnectionError as exc:
            raise SecretStoreError(DOWN, f"AWS Secrets Manager unreachable: {type(exc).__name__}")
        except BotoCoreError as exc:
            raise SecretStoreError(DOWN, f"AWS Secrets Manager failed: {type(exc).__name__}")
        text = response.get("SecretString")
        if text is None:
            blob = response.get("SecretBinary") or b""
            text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else str(blob)
        try:
            data = json.loads(text)
        except ValueError:
            raise SecretStoreError(ERROR, f"AWS secret {self.secret_name!r} is not a JSON object")
        return flatten(data, f"AWS secret {self.secret_name!r}")
