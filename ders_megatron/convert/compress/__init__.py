"""DeRS compression of trained MoE checkpoints, and the checkpoint streaming they share
with upcycling (:mod:`.streaming`): decomposition into base + deltas
(:mod:`.decomposition`), delta codecs (:mod:`.codecs`), reports (:mod:`.report`)."""
