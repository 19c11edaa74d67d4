"""Few-shot evaluation: decoding (decode.py), prompting and scoring (fewshot.py), metrics."""
