"""Planning: recipe -> Plan (pure)."""
