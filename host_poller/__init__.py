"""The host side of rlm-broker: LLM clients, the poller, and the RLM loop (holds the API keys)."""
