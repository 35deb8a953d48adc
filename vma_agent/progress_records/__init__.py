"""The agent's progress records: what an update may say (schema), where
records live (store, in Redis), and how the API shows one (view)."""
