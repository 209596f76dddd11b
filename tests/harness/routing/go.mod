module tsnsrv.local/routing-upstream

go 1.22
