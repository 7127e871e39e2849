"""Writers of checkpoints in the released layouts of each supported family: tiny random-weight ones for tests
and benchmarks (checkpoint.py, quantized_checkpoint.py, tokenizer.py), and the weight-name mapping training
uses to save the demo model (training/train.py). Nothing here loads a model; models/loader.py reads what
these write.
"""
