from scaler_wizard.cli import main

raise SystemExit(main())
