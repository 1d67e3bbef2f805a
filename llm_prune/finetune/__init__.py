"""Fine-tuning pruned encoders (BERT, ViT) with the mask held, and lottery tickets: the paper's encoder half.

    from llm_prune.finetune import MaskKeeper
    keeper = MaskKeeper.from_zeros(model, names)                    # the zeros of a pruned model are its mask
    trainer = transformers.Trainer(..., callbacks=[keeper.callback()])

    mask_keeper.py  MaskKeeper (+ a transformers TrainerCallback): pruned weights stay exactly zero
    tasks.py        GLUE (SST-2, RTE, MRPC), digits, your CSV/JSONL or image folder, split by a fixed seed
    train.py        a classifier fine-tuned with transformers' Trainer
    lth.py          iterative magnitude pruning with rewinding (lottery tickets)
    run.py          llm-prune finetune: prune -> fine-tune -> evaluate -> export, dense beside pruned
"""

from .mask_keeper import MaskKeeper

__all__ = ["MaskKeeper"]
