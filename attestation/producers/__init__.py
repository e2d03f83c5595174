"""Evidence producers, run by the node: configfs-tsm (TDX, SEV-SNP), NVML (GPUs), the simulated TEE.

Verifiers never import this package (an import-linter contract keeps it so): a client that checks
evidence does not load the simulated TEE's key derivation.
"""
