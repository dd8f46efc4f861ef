/* The online-users panel and its count badge. */
(function (ChatApp, Backbone) {
  'use strict';

  ChatApp.views.UserListView = Backbone.View.extend({
    template: ChatApp.template('user-template'),

    initialize: function (options) {
      this.badge = options.badge;
      this.me = options.me; // function: the logged-in name
      this.listenTo(this.collection, 'update reset', this.render);
    },

    render: function () {
      var me = this.me();
      var items = this.collection.map(function (user) {
        var li = document.createElement('li');
        li.className = 'list-group-item user';
        li.innerHTML = this.template({ name: user.get('name'), isMe: user.get('name') === me });
        return li;
      }, this);
      this.$el.empty().append(items);
      this.badge.textContent = String(this.collection.length);
      return this;
    }
  });
})(ChatApp, Backbone);
