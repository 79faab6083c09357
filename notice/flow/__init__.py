"""How the image reaches the answer: token groups, attention knockout between them (docs/method.md, §"Token groups
and attention knockout")."""
