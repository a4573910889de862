"""Checkpoints: save and resume sharded training state, and export Hugging Face weights.

`manager.py` writes and finds `global_step_N/` folders (atomic tracker, completion marker, fallback to an
older checkpoint on auto-resume); `extra_state.py` holds the per-rank scheduler, RNG and data position;
`safe_dcp.py` reads DCP checkpoints without running pickles; `hf_export.py` writes `huggingface/`.
"""
