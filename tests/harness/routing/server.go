// Go net/http's ServeMux, as a Go upstream routes.
package main

import (
	"fmt"
	"net/http"
	"os"
)

func main() {
	mux := http.NewServeMux()
	for _, area := range []string{"admin", "secret", "ops", "public"} {
		handler := func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "route=%s\n", area) }
		mux.HandleFunc("/api/"+area, handler)
		mux.HandleFunc("/api/"+area+"/", handler)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, "route=none saw=%s\n", r.URL.Path)
	})
	fmt.Println("listening")
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], mux); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
