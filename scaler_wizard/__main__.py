from scaler_wizard.cli import entry

entry()
