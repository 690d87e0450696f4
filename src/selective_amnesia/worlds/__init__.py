"""Small worlds the project builds itself to prove its methods end to end on a CPU."""
