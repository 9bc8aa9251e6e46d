"""Reproductions of the paper's NLP experiments (Sec. 4.2-4.3, Tables 1-5) and MasakhaNER."""
