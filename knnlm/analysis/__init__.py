"""The analyses of "Why do Nearest Neighbor Language Models Work?" (`knnlm analyze`)."""
