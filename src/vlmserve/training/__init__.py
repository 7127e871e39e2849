"""Training the demo model that ships with vlmserve: data generator (data.py), training loop (train.py),
evaluation through the real engine (evaluate.py). Not imported by serving code."""
