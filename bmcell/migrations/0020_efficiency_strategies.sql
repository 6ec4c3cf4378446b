-- Label-efficiency strategies (issue 18): class-balanced CST and AL budgets are
-- selectable per round beside the study's strategies, recorded under their own names.
ALTER TABLE rounds DROP CONSTRAINT rounds_strategy_check;
ALTER TABLE rounds ADD CONSTRAINT rounds_strategy_check
    CHECK (strategy IN ('bootstrap', 'cst', 'al', 'cst+al', 'st', 'random',
                        'least_confidence', 'entropy', 'cst-balanced', 'al-balanced'));
