"""One-shot structures at a MACs budget (the baselines) and the greedy fit into a budget they share with UVC."""
