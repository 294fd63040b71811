"""HTML reports of replayed fractions and archives (rendering only: the replay hands them its data)."""
