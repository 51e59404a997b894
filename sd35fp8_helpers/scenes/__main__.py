"""``python -m sd35fp8_helpers.scenes``: rewrite ``eval_prompts.json`` (after changing the vocabulary)."""

from .dataset import write_evaluation_prompts

if __name__ == "__main__":
    print(write_evaluation_prompts())
