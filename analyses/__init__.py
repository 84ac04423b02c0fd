"""The paper's interpretability studies (Figures 4, 5, 8) and what goes past them, as tested functions."""
