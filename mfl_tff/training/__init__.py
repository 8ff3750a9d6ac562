"""Training entry points and the TFF runtime they run on."""
