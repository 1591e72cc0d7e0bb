"""Training one fold: the loop, losses, teachers, pseudo-labels, checkpoints, the feature baseline."""
