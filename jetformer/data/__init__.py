"""Data: the embedded shapes world, real-format readers, Arrow preparation, loader, tokenizer, PCA.

    synthetic.generate_world  ->  readers (ImageFolder / COCO captions / VQAv2)  ->  prepare.prepare
    ->  dataset.ArrowImageDataset
    ->  batching.caption_batch / vqa_batch (with tokenizer.TextTokenizer)
"""
