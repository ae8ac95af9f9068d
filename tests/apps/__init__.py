"""Small apps the tests serve in real replica processes."""
