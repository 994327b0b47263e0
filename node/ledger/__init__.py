"""The contribution ledger: signed receipts of the rounds a node gave, and the run's contributors from them.

class Receipt, SignedReceipt, Totals (receipts.py): one signed line of ledger.jsonl per round given (a group's,
    or a sharded trainer's steps); sign_receipt, verify_receipt, read_receipts, totals (the running summary a
    node publishes), certificate_verdict
class GroupCertificate, Certified (certificate.py): a secure round's t+ signatures on (run scope, U) with the
    digest's inputs, checkable by anyone; statement and decode_digest, the bytes the protocol signs; secagg_scope,
    scope_of_run: the run a certificate names
class ReceiptAudit (audit.py): presented receipts checked; audit_receipts, apply_audit (rounds each PeerID is
    attested in by verified certificates, and whether a node's receipts are those its summary commits to)
class Claim, ContributorRow (contributors.py): each node's claimed figures, verified or marked; contributor_rows
    (shares of samples and rounds), rows_as_json / rows_as_csv / rows_as_text, the workdir's copy of the summaries
read_run_ledger, format_rows (listing.py): ``zen-node ledger``: the run's summaries from the DHT, printed

The signed summary record in the DHT and its validation are dht/ledger.py; the per-round keeper that writes
receipts and publishes the summary is node/training/ledger.py.
"""
