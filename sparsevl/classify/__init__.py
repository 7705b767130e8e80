"""Diff-MoE: a multimodal MoE image classifier (CIFAR-10, Fashion-MNIST, Flickr8k matching, digits).

Run `python -m sparsevl.classify --help`; modules: config, data, download, model, train, checkpoint, figures, cli.
"""
