"""chainer.links.VGG16Layers' protocol, for the legacy tests' small chains (it imports no
framework: a chain mixes it in)."""


class LayersProtocol:
    """available_layers in execution order, and __call__(x, layers=[...]) returning a dict of those
    layers' values ("prob" alone by default), from the chain's `functions`: {layer: [the callables
    applied in turn to reach it from the layer before]}."""

    @property
    def available_layers(self):
        return list(self.functions)

    def forward(self, x, layers=None):
        layers = ["prob"] if layers is None else layers
        h, out = x, {}
        for key, funcs in self.functions.items():
            for f in funcs:
                h = f(h)
            if key in layers:
                out[key] = h
        return out
