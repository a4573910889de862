"""Configuration: the typed schema (the one source of defaults and allowed values), the YAML, and checks.

`schema.py` holds one dataclass per section and composes schema + YAML + command line; `checks.py` and
`model_checks.py` refuse bad values with one line before anything expensive runs; `verl_layout.py` maps
verl's newer command line onto ours.
"""
