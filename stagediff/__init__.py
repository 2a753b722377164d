"""stagediff: staged, process-isolated diffusers inference orchestrated by Prefect."""

__version__ = "0.1.0"
