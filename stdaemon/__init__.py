"""stdaemon: SimpleTuner's cloud-training operations server as a Twisted daemon."""

__version__ = "0.1.0"
