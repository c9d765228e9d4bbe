"""The Chainer backend (legacy environment: numpy<2, chainer 7.8.1)."""
