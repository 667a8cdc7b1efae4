"""Evaluation: classifiers on a pre-trained Myna model and the TweetEval benchmark."""
