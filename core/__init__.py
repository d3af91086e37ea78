"""The shared base every layer builds on: configs, units, the cost-model vocabulary, data sets."""
