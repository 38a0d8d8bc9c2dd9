"""textenv: token-level text generation as Gymnasium environments.

    import gymnasium as gym
    import textenv  # registers textenv/<Task>-v0

    env = gym.make("textenv/Sentiment-v0", model="embedded")
    # A vector env: its tensors are on the model's device.
    envs = gym.make_vec("textenv/Toy-v0", num_envs=16, model="tiny")
    game = gym.make("textenv/GuessTheNumber-v0", model="embedded")  # multi-turn: textenv.multiturn

Importing the package only registers the ids: transformers and the models load on first use
of a name below, so code that needs only ``textenv.device`` stays light.
"""

import importlib

import gymnasium as gym

_EXPORTS = {
    "TextGenerationEnv": "textenv.env",
    "TextGenerationVectorEnv": "textenv.env",
    "char_tokenizer": "textenv.models",
    "load_causal_lm": "textenv.models",
    "tiny_causal_lm": "textenv.models",
    "kl_penalized_rewards": "textenv.kl",
    "RewardError": "textenv.rewards",
    "RewardFn": "textenv.rewards",
    "get_reward": "textenv.rewards",
    "register": "textenv.rewards",
    "score_batch": "textenv.rewards",
    "TASKS": "textenv.tasks",
    "Task": "textenv.tasks",
    "make_task": "textenv.tasks",
    "MultiTurnTextEnv": "textenv.multiturn",
    "MultiTurnTextVectorEnv": "textenv.multiturn",
    "MultiTurnTask": "textenv.tasks",
    "FunctionTask": "textenv.tasks",
    "Turn": "textenv.tasks",
}
__all__ = sorted(_EXPORTS)

# The ids of textenv.tasks.TASKS (named here so that registering them imports nothing heavy):
# single-turn tasks run in textenv.env, multi-turn ones in textenv.multiturn.
TASK_NAMES = (
    "Sentiment",
    "RewardModel",
    "Arithmetic",
    "Toy",
    "ReasoningGym",
    "Instructions",
    "RG-BasicArithmetic",
    "RG-ChainSum",
    "RG-LegCounting",
    "RG-LetterCounting",
    "RG-SpellBackward",
)

# textenv/MultiTurn-v0 is FunctionTask: pass respond= and prompts=.
MULTITURN_TASK_NAMES = (
    "Calculator",
    "GuessTheNumber",
    "TicTacToe",
    "TextArena",
    "ToyTurns",
    "MultiTurn",
)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'textenv' has no attribute {name!r}")


# Classic control as torch vector envs on the policy's device (textenv.control).
for _name, _cls in (
    ("TorchCartPole-v1", "TorchCartPole"),
    ("TorchAcrobot-v1", "TorchAcrobot"),
    ("TorchPendulum-v1", "TorchPendulum"),
    ("TorchMountainCar-v0", "TorchMountainCar"),
    ("TorchMountainCarContinuous-v0", "TorchMountainCarContinuous"),
):
    if f"textenv/{_name}" not in gym.registry:
        gym.register(id=f"textenv/{_name}", vector_entry_point=f"textenv.control:{_cls}")

for _name in TASK_NAMES + MULTITURN_TASK_NAMES:
    _id = f"textenv/{_name}-v0"
    _module, _env = (
        ("textenv.multiturn", "MultiTurnText")
        if _name in MULTITURN_TASK_NAMES
        else ("textenv.env", "TextGeneration")
    )
    if _id not in gym.registry:
        gym.register(
            id=_id,
            entry_point=f"{_module}:{_env}Env",
            vector_entry_point=f"{_module}:{_env}VectorEnv",
            kwargs={"task": "FunctionTask" if _name == "MultiTurn" else _name},
        )
