"""CPU smoke run of a Mixture-of-Experts model on the synthetic task: 4 layers (the first dense), 8 experts of width
64, top-2, one shared expert, dropless; `--config.mesh.expert=N` splits the experts over N devices."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(num_layers=4, mlp_dim=192)
  c.model.moe.update(num_experts=8, top_k=2, mlp_dim=64, shared_experts=1, first_dense=1)
  return c
