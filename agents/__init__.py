"""PPO with GAE: one core for classic-control, MuJoCo and language-model policies."""
