"""Evaluation (paper §4): samples with CFG, FID / precision / recall / KID via
torch-fidelity (domain judge or Inception), attribute accuracy, CIDEr, VQAv2 accuracy, zero-shot
classification, held-out bits/dim vs PNG, short captioning / VQA fine-tunes, trivial baselines,
and the `sample` / `caption` / `answer` / `nll` commands. Submodules are imported on use."""
