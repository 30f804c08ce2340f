"""The sweep spec: YAML read and overridden (overrides), validated into typed models (schema),
and expanded into the plan of every trial with its cost (plan). No Ray, MLflow or torch here."""
