"""Interop with other adapter formats: PEFT (IA)³ adapters <-> gain files (:mod:`~gainsurgery.interop.peft`)."""
