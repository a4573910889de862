"""Data: from files of chat conversations to the micro-batches of one optimizer step.

Files (parquet, JSON lines) are scanned for bad rows, rendered with the model's chat template and
tokenised once into a compact store (cached on disk); each dataset item is `input_ids`, `attention_mask`,
`position_ids` and `loss_mask`, padded or unpadded. The sampler picks each rank's samples per step, the
balancer and packer build micro-batches (padded, or packed rows with varlen metadata), and the prefetch
thread builds the next step while the device runs this one.
"""
