"""Turning raw talking videos into training clips (`ftalk prepare`): faces, mouths, cuts."""
