"""Reward-guided search: the engine (engine.py) and the methods it runs (methods.py)."""
from common.search.engine import (Policy, RewardModel, Search, TreeCache, entropy, filter_logits, pick_tokens,
                                  prompt_key, search_params, uniform)
from common.search.methods import (CARDS_RULES, REGISTRY, Choice, Knob, Method, Row, Run, Sampling, cards_accepts,
                                   cards_threshold, knob, knobs, make_method, method_knobs, register)

__all__ = ["CARDS_RULES", "REGISTRY", "Choice", "Knob", "Method", "Policy", "RewardModel", "Row", "Run", "Sampling",
           "Search", "TreeCache", "cards_accepts", "cards_threshold", "entropy", "filter_logits", "knob", "knobs",
           "make_method", "method_knobs", "pick_tokens", "prompt_key", "register", "search_params", "uniform"]
