"""Input pipeline: tokenizer, Flamingo sequences, pp ops and the training mixture."""
