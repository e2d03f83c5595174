"""tee-node: a confidential LLM inference node speaking the Atoma confidential-compute protocol."""

__version__ = "0.1.0"
