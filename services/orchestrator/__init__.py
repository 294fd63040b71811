"""Session orchestration: one state machine per treatment room, driven by gateway
events, worker results and console commands."""
