"""Layer 3, runs: the config schema (one typed dataclass per config node, registered in Hydra's ConfigStore)
and the run layout (stage folders, their hashes and completion markers). The stages (``stages/``) stand on it.
"""
