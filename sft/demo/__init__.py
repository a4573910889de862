"""The demo: a tiny model, tokenizer and chat data built offline, and a short training run on them.

`python -m sft.demo DIR` writes the assets (`assets.py`); `python -m sft.demo train DIR` trains on them
through the real trainer under torchrun and reports accuracy before and after (`train.py`);
`smoke_check.py` checks a finished smoke-test run.
"""
