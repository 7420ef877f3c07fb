"""The workflows the scripts run (evaluation, preference collection, the pipeline) and the scripts' one helper."""
