"""Ranking service: the feature matrix shared with training (features.py), the saved model
(model.py), cached online features (online.py) and the FastAPI app (app.py)."""
