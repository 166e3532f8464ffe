"""Reward-guided search: the engine (engine.py) and the methods it runs (methods.py)."""
from common.search.engine import (Policy, RewardModel, Search, TreeCache, entropy, filter_logits, pick_tokens,
                                  prompt_key, search_params, uniform)
from common.search.methods import (CARDS_RULES, REGISTRY, Choice, Knob, Method, Row, cards_accepts,
                                   cards_threshold, make_method, method_knobs, register)

__all__ = ["CARDS_RULES", "REGISTRY", "Choice", "Knob", "Method", "Policy", "RewardModel", "Row", "Search",
           "TreeCache", "cards_accepts", "cards_threshold", "entropy", "filter_logits", "make_method",
           "method_knobs", "pick_tokens", "prompt_key", "register", "search_params", "uniform"]
